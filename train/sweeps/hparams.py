"""TensorBoard HParams summaries of a sweep: `tensorboard --logdir DIR`, HPARAMS tab, one session per run.

    DIR/tensorboard_hparams/             the experiment: every hparam with its domain, every metric tag
    DIR/tensorboard_hparams/<run name>/  one session: start info (the run's hparams), its final metrics as
                                         scalars, end info (done -> success, failed -> failure, running)

TensorBoard's hparams plugin takes the experiment from whichever run holds its tag and lists sessions by
run directory. Written with tensorboardX's protos and FileWriter (the declared dependency); `read_hparams`
reads the event files back with a plain TFRecord reader, so no tensorboard install is needed to check them.
"""

import json
import math
import os
import struct

PLUGIN_NAME = "hparams"
EXPERIMENT_TAG = "_hparams_/experiment"
SESSION_START_TAG = "_hparams_/session_start_info"
SESSION_END_TAG = "_hparams_/session_end_info"
STATUS = {"done": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "running": "STATUS_RUNNING"}


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def sessions(report) -> list[dict]:
  """One session per run of `report` (a report.Report) that logged anything: name, hparams, metrics, status."""
  result = []
  for run in report.runs:
    if not run.records:
      continue
    values = {"variant": run.variant, "learning_rate": run.learning_rate, "seed": run.seed, "status": run.status}
    for field in report.swept_fields:
      values[field] = run.swept_value(field)
    metrics = {metric: run.final(metric) for metric in report.metrics}
    result.append({"name": run.name, "hparams": values, "step": run.steps or 0, "status": run.status,
                   "metrics": {metric: value for metric, value in metrics.items() if math.isfinite(value)}})
  return result


def _hparam_types(all_sessions: list) -> dict:
  """name -> 'number' | 'bool' | 'string': the one type all sessions' values of it fit (string otherwise)."""
  types = {}
  for session in all_sessions:
    for name, value in session["hparams"].items():
      if value is None:
        continue
      kind = "number" if _is_number(value) else "bool" if isinstance(value, bool) else "string"
      types[name] = kind if types.get(name, kind) == kind else "string"
  return types


def _as_type(value, kind: str):
  if kind == "string":
    return value if isinstance(value, str) else json.dumps(value)
  return float(value) if kind == "number" else bool(value)


def _plugin_summary(tag: str, data):
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata  # pylint: disable=import-outside-toplevel

  content = HParamsPluginData(version=0, **data).SerializeToString()
  metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content))
  return Summary(value=[Summary.Value(tag=tag, metadata=metadata)])


def write_hparams(log_dir: str, all_sessions: list) -> int:
  """Writes the experiment into `log_dir` and one session directory per entry; returns the session count."""
  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import api_pb2
  from tensorboardX.proto.plugin_hparams_pb2 import SessionEndInfo, SessionStartInfo
  from tensorboardX.summary import scalar
  from tensorboardX.writer import FileWriter

  os.makedirs(log_dir, exist_ok=True)
  types = _hparam_types(all_sessions)
  infos = []
  for name, kind in types.items():
    values = sorted({_as_type(s["hparams"][name], kind) for s in all_sessions if s["hparams"].get(name) is not None})
    info = api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(
        {"number": "DATA_TYPE_FLOAT64", "bool": "DATA_TYPE_BOOL", "string": "DATA_TYPE_STRING"}[kind]))
    if kind == "number":  # TensorBoard's table cannot sort a column without a domain
      info.domain_interval.min_value, info.domain_interval.max_value = values[0], values[-1]
    else:
      info.domain_discrete.extend(values)
    infos.append(info)
  metric_tags = list(dict.fromkeys(tag for session in all_sessions for tag in session["metrics"]))
  experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
      api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metric_tags])
  writer = FileWriter(log_dir)
  writer.add_summary(_plugin_summary(EXPERIMENT_TAG, {"experiment": experiment}))
  writer.close()
  for session in all_sessions:
    start = SessionStartInfo()
    for name, value in session["hparams"].items():
      if value is None:
        continue
      value = _as_type(value, types[name])
      field = {"number": "number_value", "bool": "bool_value", "string": "string_value"}[types[name]]
      setattr(start.hparams[name], field, value)
    end = SessionEndInfo(status=api_pb2.Status.Value(STATUS.get(session["status"], "STATUS_UNKNOWN")))
    writer = FileWriter(os.path.join(log_dir, session["name"]))
    writer.add_summary(_plugin_summary(SESSION_START_TAG, {"session_start_info": start}))
    for tag, value in session["metrics"].items():
      writer.add_summary(scalar(tag, value), global_step=session["step"])
    writer.add_summary(_plugin_summary(SESSION_END_TAG, {"session_end_info": end}))
    writer.close()
  return len(all_sessions)


def _records(path: str):
  """The payloads of a TFRecord file (length, length CRC, payload, payload CRC; CRCs not checked)."""
  with open(path, "rb") as file:
    while header := file.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      yield file.read(length)
      file.read(4)


def read_hparams(log_dir: str) -> dict:
  """{"experiment": {"hparams": {name: type}, "metrics": [tags]}, "sessions": {run: {"hparams", "metrics",
  "status"}}} from the event files under `log_dir` (the inverse of write_hparams)."""
  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import api_pb2
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

  result = {"experiment": None, "sessions": {}}
  for root, _, names in sorted(os.walk(log_dir)):
    run = os.path.relpath(root, log_dir)
    for name in sorted(names):
      if "tfevents" not in name:
        continue
      for payload in _records(os.path.join(root, name)):
        for value in Event.FromString(payload).summary.value:
          if value.metadata.plugin_data.plugin_name != PLUGIN_NAME:
            session = result["sessions"].setdefault(run, {"hparams": {}, "metrics": {}, "status": None})
            session["metrics"][value.tag] = value.simple_value
            continue
          data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
          if value.tag == EXPERIMENT_TAG:
            result["experiment"] = {
                "hparams": {info.name: api_pb2.DataType.Name(info.type) for info in data.experiment.hparam_infos},
                "metrics": [info.name.tag for info in data.experiment.metric_infos]}
            continue
          session = result["sessions"].setdefault(run, {"hparams": {}, "metrics": {}, "status": None})
          if value.tag == SESSION_START_TAG:
            session["hparams"] = {key: getattr(item, item.WhichOneof("kind"))
                                  for key, item in data.session_start_info.hparams.items()}
          elif value.tag == SESSION_END_TAG:
            session["status"] = api_pb2.Status.Name(data.session_end_info.status)
  return result
