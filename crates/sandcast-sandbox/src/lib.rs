//! The sandbox backend: one session in Linux namespaces and a cgroup, with its own network namespace.
