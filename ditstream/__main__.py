from ditstream.cli import main

main()
