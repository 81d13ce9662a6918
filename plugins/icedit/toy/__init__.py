"""The toy preset's world and weights: a small FLUX Fill trained from scratch on coloured shapes.

- `world`: scenes of 1-3 coloured shapes on a plain background and their colour edits, with a train /
  held-out split (held-out colour pairs, unseen layouts) and a `pink` split (a colour never seen);
- `make_toy`: the script that made `weights/` from a seed with this project's data, loss and sampler;
- `scorer`: the `toy` scorer of `icedit eval` (L1, and whether the asked colour was painted).
"""
