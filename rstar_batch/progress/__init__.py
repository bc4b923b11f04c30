"""The progress layer: what a job has committed and how it stops.

    checkpoint.py   chunks, the plan a resume must match, the resume rules, the
                    output's bookkeeping names
    log.py          the commit log: one small record per commit, naming the rows it
                    covers and where its scored rows lie
    drain.py        SIGTERM/SIGINT: the driver's handlers and deadline, the stop flag

io/ and stages/ stand on this layer; nothing here imports from them.
"""
