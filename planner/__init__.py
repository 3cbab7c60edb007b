"""Plans a megatrain run before it starts: will this model fit this GPU / RAM / SSD, how fast, and why.

Pure Python (no torch, no lightning): `python -m planner.check ...` answers in well under two seconds.
`planner.calibrate` is the one module that imports torch, to measure a machine.
"""
