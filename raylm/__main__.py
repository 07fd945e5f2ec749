from raylm.cli import main

raise SystemExit(main())
