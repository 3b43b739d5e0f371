"""The SSH backend: the same node agents on real devices, reached with paramiko (``cluster``)."""
