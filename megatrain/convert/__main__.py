from megatrain.convert import main

raise SystemExit(main())
