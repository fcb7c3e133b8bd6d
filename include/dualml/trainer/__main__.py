from dualml.trainer.task import exit_process, main

exit_process(main())
