from kvrepl.cli import entry

entry()
