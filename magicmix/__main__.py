from magicmix.cli import main

main()
