from kvrepl.app.cli import entry

entry()
