"""The CUDA data path (protocol §4.3 ``cuda``/``cuda_raw``/``cuda_vmm``, §15.2).

Nothing in this package imports torch at import time: torch with CUDA is the optional extra
``kvhive[cuda]``, imported only when a CUDA descriptor arrives (:mod:`.runtime`).

* :mod:`.runtime`   lazy torch import, the device table (``device_uuid`` -> ordinal)
* :mod:`.ipc_open`  opening the three IPC wrapper kinds into strided device tensors
* :mod:`.events`    the worker's interprocess event in, the server's event out
* :mod:`.pinning`   page-locking L1 host memory for DMA
"""
