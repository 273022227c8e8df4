from leanlm.cli import main

raise SystemExit(main())
