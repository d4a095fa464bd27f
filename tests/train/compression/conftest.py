"""Shared fixtures of the compression tests."""

import hashlib
import os

import pytest


def tree_digest(directory) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory`: equal before and after means nothing was touched."""
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as file:
        digests[os.path.relpath(path, directory)] = hashlib.sha256(file.read()).hexdigest()
  return digests


@pytest.fixture(name="tree_digest")
def tree_digest_fixture():
  return tree_digest
