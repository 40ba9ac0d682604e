"""`make bench`: glancefs side by side with curl and python-glanceclient against one real Glance.

    python -m bench [--runs N] [--only NAME,...] [--mount-option OPT ...] [--report FILE]
                    [--keep-dir]

Starts its own Glance (lab.servers.GlanceServer in a temporary directory), creates the data (a
1 GiB random image; 5,000 small image records inserted into Glance's SQLite for the listing test),
installs python-glanceclient in its own cached virtualenv (lab.venvs), runs every measurement
``--runs`` times against the same server, and prints one JSON line per metric, then the table
with each metric's target (set where the metric is measured, in bench.run). A run of every group
writes the table, the machine and the commit into ``--report`` (BENCHMARKS.md, between the
``bench:results`` markers); a run with ``--only`` prints them only. BENCHMARKS.md says how each
figure is taken. Needs root (mounting, dropping the page cache), curl, fio and qemu-img.
"""
