from mcrelay.cli import main

main()
