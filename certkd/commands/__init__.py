"""The commands, one module each, named after the command: what it computes per point and how it
summarizes; the run itself (configuration, record log, shards, memory plan) is ``certkd.run.Run``.

``certify``'s methods, records and summary live in ``certkd.certification``.
"""
