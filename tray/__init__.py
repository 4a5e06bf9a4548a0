"""The system-tray app (`vasa-avatar-tray`): menu model (menu.py), icon and runner (app.py),
start at login (autostart.py)."""
