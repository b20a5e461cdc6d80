from mansu.cli import main

raise SystemExit(main())
