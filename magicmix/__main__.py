from magicmix.cli.main import main

main()
