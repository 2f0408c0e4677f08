from cxrlabel.cli import main

raise SystemExit(main())
