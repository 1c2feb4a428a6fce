from based.cli import main

raise SystemExit(main())
