from megatrain.cli import main

raise SystemExit(main())
