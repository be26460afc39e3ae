"""Built-in L2 adapter types; ``kvhive.storage.l2.registry`` maps each ``type`` to a builder."""
