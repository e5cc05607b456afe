from nftui.cli import main

main()
