"""Everything about cached KV: what is stored, for whom, where, and how a forward reads it.

- `manager.py`: the seam the scheduler calls (admit, fed, commit, free) and every reuse decision;
- `tree.py`, `node.py`: the radix tree over token ids, its budgets and pins (torch-free);
- `scope.py`: fingerprints, scopes, owners, who may read whose turns, the kinds of runs;
- `eviction.py`: the policies, and the heap that finds each victim;
- `runs.py`: the tensors (`KVRun`, `RowBuffer`) and their byte counts;
- `attention.py`: the cascade kernel and the model's own path, registered with transformers;
- `disk/`: the disk tier (files, which nodes go there, the tree's disk side).
"""
