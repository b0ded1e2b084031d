"""Point-in-time recovery, one module per concern, in the order a recovery meets them:

- ``target``: what to recover to (time, LSN, restore point, latest), checked for form;
- ``window``: what the archive can reach, and the base backup to start from;
- ``approval``: which cluster may be recovered, and who must approve;
- ``recovery``: the data directory and the server, through the cluster's handle;
- ``report``: the markdown report of a finished recovery.

``flows/pitr.py`` is the runbook that strings them together.
"""
