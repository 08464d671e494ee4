from smallbig.cli import main

raise SystemExit(main())
