"""The closed loop (`paraplan validate`, `POST /v1/validations`): profile this machine, run every valid plan,
compare with the predictions, recalibrate.

The loop, in order:
1. a profile of this machine for the model (layers at every micro-batch size, tp degree and recompute mode the
   plans use, and the collectives of `nproc` ranks), unless an existing one is given; with several passes of
   runs, one profile pass before each pass of runs, the profiles pooled (profiler/pool.py);
2. every plan the search space holds for `nproc` ranks (planner/search/space.py) that the executor can run, and
   with `techniques` one entry per technique (cp, fp16, offload, ep) this machine can run, each with the setup it
   trains (its model, its precision) and, for another model or precision, its own layers profiled;
3. each plan trained by the executor under torchrun for a few steps; its steady step time is the median of the
   steps after the warm-up ones, and it is stored as a measured run with its plan and its estimate; paired
   (`--paired`), each run is predicted from its plan's layer shapes profiled again just before it;
   then the finalists (the plans predicted and measured fastest) run a few times more, pooled, until the plan
   measured fastest is one that ran again (`confirm_finalists`);
4. predicted vs measured, before calibration and after (each plan predicted by a calibration fitted on the other
   half of the plans only), and the calibration fitted on all runs, saved with the profile.
No torch here: the profiler and the runs import it in their own processes or on first use.

No rich here: progress goes through a callback (api/commands/progress.py), which the CLI draws.

Modules: setup (what to validate, which plans), techniques (the technique entries), runs (one plan run), schedule
(passes, finalists, pooling), profile (the profile measured for the plans), compare (figures, calibration), records
(runs.json, database rows), validate (the loop), report (report.md and the plot).
"""
