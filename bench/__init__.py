"""`make bench`: glancefs side by side with curl and python-glanceclient against one real Glance.

    python -m bench [--runs N] [--only NAME,...] [--mount-option OPT ...] [--keep-dir]

Starts its own Glance (lab.servers.GlanceServer in a temporary directory), creates the data (a
1 GiB random image; 5,000 small image records inserted into Glance's SQLite for the listing test),
installs python-glanceclient in its own cached virtualenv (lab.venvs), runs every measurement
``--runs`` times against the same server, and prints a table plus one JSON line per metric. The
targets are SPEC.md's "How well"; results and the machine they ran on are in BENCHMARKS.md.
Needs root (mounting, dropping the page cache), curl and fio.
"""
