from tasklab.cli import main

main()
