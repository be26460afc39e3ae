"""Helpers shared by every test directory, each in one place (importable as ``support``:
``pythonpath = ["tests"]`` in pyproject's ``[tool.pytest.ini_options]``).

* :mod:`support.net` -- free loopback ports;
* :mod:`support.shm` -- POSIX shared-memory segments and vLLM-CPU KV caches in them;
* :mod:`support.descriptors` -- hand-encoded ``cpu_shm`` IPC descriptors, contiguous strides;
* :mod:`support.servers` -- an in-process :class:`~kvhive.server.core.KvhiveServer`
  (subprocess servers: :class:`kvhive.bench.servers.ServerProcess`);
* :mod:`support.traffic` -- real wire-protocol traffic from one registered worker;
* :mod:`support.prom` -- Prometheus text exposition, parsed by ``prometheus_client``;
* :mod:`support.paths` -- kvhive's source tree for interpreters that do not have kvhive installed.

Scripts run outside pytest (``bench_paged.py``) need ``PYTHONPATH=tests``.
"""
