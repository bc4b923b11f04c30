from rstar_batch.cli import main

raise SystemExit(main())
