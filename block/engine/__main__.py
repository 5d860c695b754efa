from block.engine.cli import main

main()
