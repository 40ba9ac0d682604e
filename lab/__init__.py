"""Test/demo/bench harness: real OpenStack Glance (and Keystone) on loopback.

glancefs is only as correct as its behaviour against the real service, so tests run
the real servers from cached venvs (lab.venvs) instead of mocks; lab.servers starts
and stops them, and ``python -m lab`` keeps one running for demos and benchmarks.
Standard library only: it runs in glancefs's environment, while the servers run in
their own venvs.

- lab.servers: one Glance (SQLite, file store) or Keystone under gunicorn, each in its
  own process group with safety nets so nothing outlives the test run.
- lab.faults: FaultProxy, an HTTP/1.1 proxy that puts chosen faults (503, reset,
  truncation, a flipped byte, delay, no answer, cut upload, hold) between a client and
  Glance, and counts the requests (image-data GETs per image, with their Range).
- lab.production: ProductionLab, two Glance nodes behind HAProxy on one PostgreSQL and
  one Ceph cluster, whose nodes tests kill, freeze and restart.
- lab.ceph, lab.swift: a one-node Ceph cluster (Glance's rbd store) and Swift all-in-one
  (its swift store) on loopback; lab.stores: one Glance offering its file store and both.
- lab.rows: catalogs of any size written straight into a lab Glance's SQLite.
- lab.limits: LimitsLab, Keystone and a Glance enforcing Keystone's unified limits (the
  quotas), with a project of its own, and its own limits, per test.
"""
