from emfm.cli import main

main()
