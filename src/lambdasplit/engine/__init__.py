"""The body engine: sessions and the scheduler that runs them, shared by the server and LocalBody.

Transport-free on purpose: `cloud/` puts it behind a WebSocket and `local.py` gives the device a
body in this process (`LocalBody`). The device imports the engine only when it asks for that body,
never on `import lambdasplit`.
"""
