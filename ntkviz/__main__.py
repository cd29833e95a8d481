from ntkviz.cli import main

raise SystemExit(main())
