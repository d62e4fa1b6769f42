from certkd.cli import main

main()
