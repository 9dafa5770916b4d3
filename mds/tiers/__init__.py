"""The storage tiers the Store composes: memory, LMDB disk, the durable tier (SQLite) and the
realtime cache. Each depends on the data model and the kernels only, never on the Store."""
