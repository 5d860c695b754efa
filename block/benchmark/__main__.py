from block.benchmark.cli import main

main()
