"""The disk tier: KV that outlives memory pressure and restarts.

- `store.py`: the files (safetensors, verified on every read) and their SQLite index;
- `tier.py`: which nodes go to disk, write-through, loading back, restoring at start;
- `copies.py`: the tree's side, each node's copy and its bytes under the disk budget (torch-free).
"""
