"""Test/demo/bench harness: real OpenStack Glance (and Keystone) on loopback.

glancefs is only as correct as its behaviour against the real service, so tests run
the real servers from cached venvs (lab.venvs) instead of mocks; lab.servers starts
and stops them, and ``python -m lab`` keeps one running for demos and benchmarks.
Standard library only: it runs in glancefs's environment, while the servers run in
their own venvs.
"""
