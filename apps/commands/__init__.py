"""One module per command (or command group); each defines `register(app)`.

`apps.cli` discovers the modules here, so adding a command never touches a shared file.
Heavy imports (torch, mlx) happen inside the command functions, keeping `elm --help` fast.
"""
