"""Helpers of the tests that compare what a run left on disk."""

import os


def read_tree(directory) -> dict[str, bytes]:
  """{relative path: bytes} of every file under `directory`."""
  tree = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        tree[os.path.relpath(path, directory)] = f.read()
  return tree
