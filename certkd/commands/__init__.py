"""The commands, one module each, named after the command: what it computes per point and how it
summarizes; the run itself (configuration, record log, shards, memory plan) is ``certkd.run.Run``.

``certify`` lives in ``certkd.certification`` (its methods, records, run and summary).
"""
