"""The body engine: sessions and the scheduler that runs them, shared by the server and LocalBody.

Transport-free on purpose: `cloud/` puts it behind a WebSocket, `device/` calls it in process, and
neither imports the other.
"""
