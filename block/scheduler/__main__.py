from block.scheduler.cli import main

main()
