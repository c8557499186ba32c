"""The app floor: command line, REPL, slash commands and renderers; calls chat/ below."""
