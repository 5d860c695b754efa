from block.predictor.cli import main

main()
