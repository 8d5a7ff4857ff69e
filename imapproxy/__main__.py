from imapproxy.cli import main

raise SystemExit(main())
