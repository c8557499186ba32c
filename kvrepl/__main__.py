from kvrepl.cli import main

raise SystemExit(main())
