from cmapkd.cli import main

raise SystemExit(main())
